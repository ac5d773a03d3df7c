"""Routing traces of generated numbered answers: sub-answer boundaries and per-segment accuracy, and the
recorder's prompt accuracy against a hand count on a tiny MeteoRA model."""

from typing import ClassVar

import pytest
import torch

from helpers import save_peft_adapter, tiny_llama
from meteora import attach_meteora
from stages.traces import Top1RoutingRecorder, answer_trace, item_starts


class PieceTokenizer:
    """Token id i decodes to PIECES[i] (concatenated); 0 is EOS and padding."""

    PIECES: ClassVar[list[str]] = ["</s>", "1", ".", " yes", "\n", "2", " no", "3", " maybe", ".5"]
    eos_token_id = pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids if not (skip_special_tokens and i == 0))

    def convert_ids_to_tokens(self, ids):
        return [self.PIECES[i] for i in ids]


def test_item_starts():
    assert item_starts("1. a\n2. b\n3) c", 3) == [0, 5, 10]
    assert item_starts("  1. a\n2.5 km\n", 2) == [2, None]
    assert item_starts("1. a\n1. again\n2. b", 2) == [0, 14]


def test_answer_trace_boundaries_and_segments():
    # "1. yes\n2. no\n3. maybe" then EOS and padding
    ids = [1, 2, 3, 4, 5, 2, 6, 4, 7, 2, 8, 0, 0]
    adapters = ["ta", "tb", "tc"]
    majority = [0, 0, 0, 0, 1, 1, 1, 0, 2, 2, 2, 2, 2]  # token 7 ("\n" ending item 2) routed to ta
    shares = [torch.nn.functional.one_hot(torch.tensor(a), 3).float() for a in majority]
    trace = answer_trace(PieceTokenizer(), ids, shares, ["ta", "tb", "tc"], adapters)
    assert trace["answer"] == "1. yes\n2. no\n3. maybe"
    assert len(trace["tokens"]) == len(trace["share"]) == 11  # cut at the first EOS
    assert trace["boundaries"] == [{"position": 0, "task": "ta"}, {"position": 4, "task": "tb"},
                                   {"position": 8, "task": "tc"}]
    assert trace["segment_accuracy"] == {"ta": 1.0, "tb": 0.75, "tc": 1.0}
    assert trace["top1"] == majority[:11]


def test_answer_trace_without_numbers_has_no_boundaries():
    trace = answer_trace(PieceTokenizer(), [3, 6, 0], [torch.tensor([1.0, 0.0])] * 3, ["ta", "tb"], ["ta", "tb"])
    assert trace["boundaries"] == [] and trace["segment_accuracy"] == {}
    assert answer_trace(PieceTokenizer(), [0, 0], [torch.zeros(2)] * 2, ["ta"], ["ta", "tb"]) == {}


def test_recorder_counts_prompt_tokens_routed_to_their_label(tmp_path):
    base = tiny_llama(seed=1)
    dirs = {f"t{i}": save_peft_adapter(base, tmp_path / f"t{i}", seed=i) for i in range(3)}
    model = attach_meteora(base, dirs, top_k=2)
    torch.manual_seed(0)
    ids = torch.randint(3, 90, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding of the first prompt
    labels = [2, 0, None]
    with Top1RoutingRecorder(model, labels) as recorder:
        recorder.set_rows([0, 1, 2])
        model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids[:, :1], attention_mask=torch.ones(3, 8, dtype=torch.long))  # one decode step
    # the hand count: per module the top-1 adapter of every non-padding token, from the gates themselves
    model.keep_routing(True)
    model(input_ids=ids, attention_mask=mask)
    trace = model.routing_trace()
    for row, label in enumerate(labels):
        per_layer = [0.0, 0.0]
        for name, idx in trace.items():
            layer = int(name.split(".layers.")[1].split(".")[0])
            hits = (idx[row, :, 0] == (-1 if label is None else label)) & mask[row].bool()
            per_layer[layer] += float(hits.sum()) / 7
        assert recorder.correct[row].tolist() == pytest.approx(per_layer)
        assert recorder.count[row] == float(mask[row].sum())
    assert float(recorder.correct[2].sum()) == 0.0
    assert recorder.answer_ids == {0: [int(ids[0, 0])], 1: [int(ids[1, 0])], 2: [int(ids[2, 0])]}
    assert all(torch.isclose(s[0].sum(), torch.tensor(1.0)) for s in recorder.answer_share.values())


def test_trace_index_out_of_range_is_named_before_decoding():
    import pytest
    from omegaconf import OmegaConf

    from stages.common import ConfigError
    from stages.evaluate import check_trace_index

    cfg = OmegaConf.create({"eval": {"trace": {"composite": "composite-3", "index": 4},
                                     "chained": {"max_samples": 4}}})
    composites = {"composite-3": [{"input": "a"}] * 4}
    with pytest.raises(ConfigError, match=r"eval.trace.index=4: composite-3 has 4 chained samples.*max_samples=4"):
        check_trace_index(cfg, composites)
    cfg.eval.trace.index = 3
    check_trace_index(cfg, composites)
    check_trace_index(cfg, {})  # the traced set is not evaluated here: nothing to check
