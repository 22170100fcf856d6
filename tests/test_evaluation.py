"""The demo's evaluation: one fixed held-out set, a token-weighted loss that matches an independent float64
cross-entropy, a masked sub-network scoring exactly like its extracted standalone model, and the report files."""

import math
import os

import pytest
import torch


def test_fixed_eval_set_is_the_same_validation_tokens_every_time(tiny_pipeline):
    from megatron_elastic.evaluation import fixed_eval_set

    a = fixed_eval_set(tiny_pipeline["data"], 64, 2048, micro_batch_size=4)
    b = fixed_eval_set(tiny_pipeline["data"], 64, 2048, micro_batch_size=4)
    assert sum(x["tokens"].numel() for x in a) == 2048
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))
    from megatron_elastic.data.loader import calibration_batches
    from megatron_elastic.evaluation import EVAL_SEED

    train = calibration_batches(tiny_pipeline["data"], 64, 2048, 4, seed=EVAL_SEED, split="train")
    assert not any(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, train))  # held out, not training text


def test_evaluate_lm_matches_a_float64_cross_entropy_of_the_logits(tiny_pipeline):
    from megatron_elastic.evaluation import evaluate_lm, fixed_eval_set, load_standalone
    from megatron_elastic.training.lm import lm_logits

    batches = fixed_eval_set(tiny_pipeline["data"], 64, 1024, micro_batch_size=4)
    model = load_standalone(tiny_pipeline["parent"])
    got = evaluate_lm(model, batches)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = lm_logits(model, b).double()
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="none")
            mask = b["loss_mask"].flatten().double()
            total += float((nll * mask).sum())
            count += int(mask.sum())
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["bpb"] == pytest.approx(got["loss"] / math.log(2))


def test_masked_subnetwork_scores_like_its_extracted_model_and_report_is_written(tiny_pipeline, tmp_path):
    from megatron_elastic.elastic.arch import ElasticArch
    from megatron_elastic.evaluation import evaluate_checkpoint, evaluate_subnetworks, fixed_eval_set, write_report
    from megatron_elastic.extraction.extract import extract
    from megatron_elastic.parallel import initialize_parallel
    from megatron_elastic.store.open_run import config_from_checkpoint

    initialize_parallel(1, 1)
    sorted_ckpt = os.path.join(tiny_pipeline["importance"], "sorted")
    cfg = config_from_checkpoint(os.path.join(sorted_ckpt, "iter_0000000")).model_config()
    arch = ElasticArch.full(cfg)
    arch.skipped_layers = (3,)
    arch.hidden_size = 24
    (tmp_path / "small.json").write_text(arch.to_json())
    row = extract(sorted_ckpt, str(tmp_path / "out"), arch_file=str(tmp_path / "small.json"), fmt="megatron")[0]
    batches = fixed_eval_set(tiny_pipeline["data"], 64, 1024, micro_batch_size=4)
    standalone = evaluate_checkpoint(row["megatron"], batches)
    masked = evaluate_subnetworks(sorted_ckpt, {"small": arch}, batches)["small"]
    full = evaluate_subnetworks(sorted_ckpt, {"full": ElasticArch.full(cfg)}, batches)["full"]
    assert standalone["parameters"] == masked["parameters"] == row["parameters"] < full["parameters"]
    assert standalone["loss"] == pytest.approx(masked["loss"], rel=1e-5)
    assert abs(standalone["loss"] - full["loss"]) > 1e-3  # the sub-network is a different model

    rows = [{"name": "small", "method": "extracted", **standalone}, {"name": "full", "method": "parent", **full}]
    report = write_report(str(tmp_path / "rep"), "t", rows, ["## notes\nhello"])
    text = open(report).read()
    assert f"{standalone['parameters']:,}" in text and f"{full['bpb']:.3f}" in text and "hello" in text
    with open(tmp_path / "rep" / "pareto.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
