"""Test-session set-up. Triton kernels run on the CPU through Triton's interpreter, which must be switched
on before anything imports triton (transformers and peft may); METEORA_KERNEL_TEST_DEVICE=cuda keeps them
compiled for a GPU run of tests/test_kernels.py."""
import os

if os.environ.get("METEORA_KERNEL_TEST_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
