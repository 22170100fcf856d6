"""Asynchronous checkpoints (``checkpoint.async_save``, Megatron's async dist_checkpointing): the save returns while a
forked writer writes a snapshot of the weights; the checkpoint becomes ``latest`` only when complete; what it holds
is the state at the save, not later changes; every rank hashes its share of the manifest."""

import json
import os

import pytest
import torch

from tests.elastic.test_elastic_training import _train, _train_records


def _model():
    from megatron_elastic.model.builder import build_hybrid_model
    from megatron_elastic.testing import tiny_config

    torch.manual_seed(0)
    return build_hybrid_model(tiny_config())


def test_an_async_save_holds_the_weights_of_its_moment_and_is_latest_only_when_complete(
    single_process_parallel, tmp_path
):
    from megatron_elastic.store.checkpoint import CheckpointWriter, load_model_weights, verify_checkpoint

    model = _model()
    saved = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    writer = CheckpointWriter(async_save=True)
    path = writer.save(str(tmp_path), 7, model, trainer_state={"note": "async"})
    assert writer.in_flight and not os.path.exists(tmp_path / "latest") and not os.path.exists(path)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # the training step goes on while the writer writes
    writer.wait()
    assert not writer.in_flight and (tmp_path / "latest").read_text() == "iter_0000007"
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))
    verify_checkpoint(path)
    manifest = json.load(open(os.path.join(path, "manifest.json")))["files"]
    assert any(f.endswith(".distcp") for f in manifest) and "trainer_state.json" in manifest
    fresh = _model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.fill_(3.0)
    load_model_weights(str(tmp_path), fresh)
    for k, v in fresh.state_dict().items():
        if k in saved:
            torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")


def test_elastic_training_with_async_saves_equals_synchronous_saves(single_process_parallel, parent, tmp_path):
    from megatron_elastic.store.reader import CheckpointTensorReader

    runs = {}
    for mode in ("sync", "async"):
        ckpt = str(tmp_path / mode)
        overrides = [
            "checkpoint.save_interval=1",
            "checkpoint.keep_last=10",
            f"checkpoint.async_save={mode == 'async'}",
        ]
        _train(parent, ckpt, overrides=overrides)
        runs[mode] = ckpt
    assert _train_records(runs["sync"]).keys() == _train_records(runs["async"]).keys()
    for step, rec in _train_records(runs["sync"]).items():
        other = _train_records(runs["async"])[step]
        kd = {k: v for k, v in rec.items() if k.startswith("kd/")}
        assert kd and kd == pytest.approx({k: v for k, v in other.items() if k.startswith("kd/")}, rel=1e-6)
    dirs = sorted(d for d in os.listdir(runs["async"]) if d.startswith("iter_"))
    assert dirs == sorted(d for d in os.listdir(runs["sync"]) if d.startswith("iter_")) and len(dirs) == 6
    for d in dirs:
        a = CheckpointTensorReader(os.path.join(runs["async"], d))
        b = CheckpointTensorReader(os.path.join(runs["sync"], d))
        assert a.names() == b.names()
        for n in a.names():
            if not n.endswith("_extra_state"):
                torch.testing.assert_close(a.load(n), b.load(n), rtol=0, atol=0, msg=lambda m: f"{d} {n}: {m}")


def test_pretraining_refuses_async_saves(single_process_parallel, tmp_path):
    from megatron_elastic.errors import ConfigError
    from megatron_elastic.store.job_config import load_pretrain_config
    from megatron_elastic.training.pretrain import pretrain
    from tests.tiny_pipeline import TINY_PARENT_JOB

    job = TINY_PARENT_JOB.format(data=tmp_path / "d", ckpt=tmp_path / "c", iters=1, vocab_size=264)
    with pytest.raises(ConfigError, match="async_save"):
        pretrain(load_pretrain_config(text=job, overrides=["checkpoint.async_save=true"]), progress=False)


def _share_job(rank, world, root):
    import torch.distributed as dist

    from megatron_elastic.errors import CheckpointCorruptError
    from megatron_elastic.model.builder import build_hybrid_model
    from megatron_elastic.parallel import initialize_parallel
    from megatron_elastic.store import checkpoint
    from megatron_elastic.testing import tiny_config

    initialize_parallel(2, 1, seed=3)
    model = build_hybrid_model(tiny_config(tensor_model_parallel_size=2))
    hashed = []
    digest = checkpoint._file_digest
    checkpoint._file_digest = lambda path: hashed.append(os.path.relpath(path, root)) or digest(path)
    path = checkpoint.save_checkpoint(root, 1, model)
    every = [None, None]
    dist.all_gather_object(every, [h.replace("iter_0000001.tmp", "iter_0000001") for h in hashed])
    files = json.load(open(os.path.join(path, "manifest.json")))["files"]
    assert sorted(every[0] + every[1]) == sorted(f"iter_0000001/{f}" for f in files), "every file hashed exactly once"
    mine = [f for f in every[rank] if f.endswith(".distcp")]
    assert mine and all(os.path.basename(f).startswith(f"__{rank}_") for f in mine), "each rank hashes what it wrote"
    # Loading: each rank checks its share; a damaged file of rank 1's share fails the load on both ranks.
    hashed.clear()
    checkpoint.load_checkpoint(path, model, load_rng=False)
    assert 0 < len(hashed) < len(files)
    dist.barrier()
    if rank == 1:
        victim = os.path.join(path, sorted(f for f in files if f.startswith("dist/__1_"))[0])
        with open(victim, "r+b") as f:
            f.seek(8)
            f.write(b"\x00\xff\x00\xff")
    dist.barrier()
    with pytest.raises(CheckpointCorruptError, match="__1_"):
        checkpoint.load_checkpoint(path, model, load_rng=False)


def test_every_rank_hashes_its_own_share_of_a_checkpoint(tmp_path):
    from megatron_elastic.testing import run_multiprocess

    run_multiprocess(2, _share_job, str(tmp_path))


def _bf16_training(distributed_optimizer: bool):
    """A tiny bf16 model (norms, A_log and D in fp32) and a builder of its training components, seeded alike."""
    import types

    from megatron_elastic.testing import tiny_config
    from megatron_elastic.training.setup import build_training_components

    cfg = tiny_config(params_dtype=torch.bfloat16, bf16=True)
    train = types.SimpleNamespace(
        lr=1e-2,
        min_lr=1e-3,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        clip_grad=1.0,
        lr_warmup_iters=0,
        train_iters=10,
        lr_decay_style="cosine",
        distributed_optimizer=distributed_optimizer,
    )

    def build():
        torch.manual_seed(0)
        return build_training_components(cfg, train)

    return cfg, build


def _two_steps(c):
    """Two optimizer steps on random gradients: every parameter gets Adam state."""
    assert {p.dtype for p in c.unwrapped.parameters()} == {torch.bfloat16, torch.float32}
    for _ in range(2):
        for p in c.model.parameters():
            p.main_grad.normal_()
        c.optimizer.step()
    return c


def _assert_same_states(after, before):
    """Every parameter's optimizer state (name -> {state name: tensor}) bit-exactly as it was."""
    for name in before:
        for k in before[name]:
            torch.testing.assert_close(
                after[name][k], before[name][k], rtol=0, atol=0, msg=lambda m: f"{name}.{k}: {m}"
            )


@pytest.mark.parametrize("sharding", ["dp_reshardable", "fully_reshardable"])
def test_a_bf16_model_with_fp32_parameters_checkpoints_its_distributed_optimizer(
    single_process_parallel, tmp_path, sharding
):
    """Our bf16 models keep norms, A_log and D in fp32; Megatron's distributed optimizer then indexed another
    parameter's main copy in its state-dict paths (the 12B rehearsal's first save failed). Each parameter's main
    copy now rounds to the parameter itself, and a save and load round-trips the optimizer state."""
    from megatron_elastic.store.checkpoint import load_checkpoint, save_checkpoint

    cfg, build = _bf16_training(distributed_optimizer=True)
    c = _two_steps(build())
    (opt,) = getattr(c.optimizer, "chained_optimizers", [c.optimizer])

    def states(o, model):
        out = {}
        for name, p in model.named_parameters():
            t = o._get_main_param_and_optimizer_states(p)
            assert torch.equal(t["param"].to(p.dtype), p.detach().view(-1)), f"{name}: not its own main copy"
            out[name] = {k: v.clone() for k, v in t.items() if k in ("param", "exp_avg", "exp_avg_sq", "step")}
        return out

    before = states(opt, c.unwrapped)
    # plan's stop-checkpoint size (elastic.memory.checkpoint_bytes) against the tensors this checkpoint holds
    from megatron_elastic.elastic.memory import checkpoint_bytes

    held = sum(p.numel() * p.element_size() for p in c.unwrapped.parameters())
    held += sum(t.numel() * t.element_size() for st in before.values() for k, t in st.items() if k != "step")
    assert checkpoint_bytes(cfg) == pytest.approx(held, rel=0.03)
    save_checkpoint(str(tmp_path), 2, c.unwrapped, c.optimizer, optimizer_sharding=sharding)
    stored = json.load(open(tmp_path / "iter_0000002" / "trainer_state.json"))["optimizer_layout"]
    assert stored["sharding"] == sharding and stored["distributed_optimizer"]
    fresh = build()
    load_checkpoint(os.path.join(tmp_path, "iter_0000002"), fresh.unwrapped, fresh.optimizer, load_rng=False)
    after = states(getattr(fresh.optimizer, "chained_optimizers", [fresh.optimizer])[0], fresh.unwrapped)
    _assert_same_states(after, before)


def test_a_bf16_model_with_fp32_parameters_checkpoints_megatrons_mixed_precision_optimizer(
    single_process_parallel, tmp_path
):
    """The same model under Megatron's non-distributed mixed-precision optimizer (``distributed_optimizer: false``,
    e.g. a bf16 run on one machine): its state-dict paths number the optimizer's parameters as if all were bf16, so
    the fp32 ones shifted every later parameter's state (the first save failed with a size mismatch). Each model
    parameter's Adam state and main copy round-trip a save and a load, and each main copy rounds to its parameter."""
    from megatron_elastic.store.checkpoint import load_checkpoint, save_checkpoint

    _, build = _bf16_training(distributed_optimizer=False)

    def states(c):
        (opt,) = getattr(c.optimizer, "chained_optimizers", [c.optimizer])
        out = {}
        for name, p in c.unwrapped.named_parameters():
            main = getattr(p, "main_param", p)
            assert torch.equal(main.to(p.dtype), p.detach()), f"{name}: not its own main copy"
            out[name] = {"param": main.detach().clone(), **{k: v.clone() for k, v in opt.optimizer.state[main].items()}}
        return out

    c = _two_steps(build())
    before = states(c)
    initial = dict(build().unwrapped.named_parameters())
    moved = [n for n, p in c.unwrapped.named_parameters() if not torch.equal(p, initial[n])]
    assert moved == list(initial), "every parameter, bf16 and fp32, is trained (copied back from its main copy)"
    save_checkpoint(str(tmp_path), 2, c.unwrapped, c.optimizer)
    fresh = build()
    load_checkpoint(os.path.join(tmp_path, "iter_0000002"), fresh.unwrapped, fresh.optimizer, load_rng=False)
    after = states(fresh)
    for name in before:
        assert set(after[name]) == set(before[name]) >= {"param", "exp_avg", "exp_avg_sq"}, name
    _assert_same_states(after, before)
