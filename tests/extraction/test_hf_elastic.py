"""`extract --format hf-elastic`: one Hugging Face directory with the full weights and a budget table; its shipped
remote code builds each listed budget with transformers alone (slicing at load time), and each equals the
standalone `extract --format hf` model of that budget, logit for logit."""

import json
import os

import pytest
import torch


def test_every_listed_budget_equals_its_standalone_export(elastic_run, tmp_path):  # noqa: F811
    transformers = pytest.importorskip("transformers")
    from megatron_elastic.extraction.extract import extract
    from megatron_elastic.extraction.hf_elastic import export_hf_elastic

    one = str(tmp_path / "one")
    rows = export_hf_elastic(elastic_run, one, budgets=["all"], table_step=0.1)
    directory = rows[0]["hf-elastic"]
    names = [r["name"] for r in rows]
    assert names[:3] == ["1", "0.75", "0.5"] and "router:0.6" in names and "router:0.7" in names
    table = json.load(open(os.path.join(directory, "config.json")))["elastic_budgets"]
    assert sorted(table) == sorted(names)
    separate = str(tmp_path / "separate")
    standalone = {r["name"]: r["hf"] for r in extract(elastic_run, separate, budgets=["all", "0.6"], fmt="hf")}
    assert set(standalone) == {"1", "0.75", "0.5", "0.6"}
    ids = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(4))
    cases = [("1", "1"), ("0.75", "0.75"), ("0.5", "0.5"), ("router:0.6", "0.6"), ("0.64", "0.6")]
    got = _load_with_transformers_alone(directory, [n for n, _ in cases], ids, tmp_path)
    for name, ref in cases:
        want = transformers.AutoModelForCausalLM.from_pretrained(standalone[ref], dtype=torch.float32)
        assert got[name]["parameters"] == sum(p.numel() for p in want.parameters()), name
        with torch.no_grad():
            torch.testing.assert_close(got[name]["logits"], want(input_ids=ids, use_cache=False).logits, rtol=0, atol=0)
    assert got["full"]["parameters"] == rows[0]["parameters"]
    assert "below every listed budget" in got["0.3"]["error"]


SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
directory, names, ids_file, out_file = sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[4]
ids = torch.load(ids_file)
out = {}
for name in names + ["full", "0.3"]:
    try:
        kw = {} if name == "full" else {"elastic_budget": name}
        m = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32, **kw)
    except ValueError as e:
        out[name] = {"error": str(e)}
        continue
    assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
    with torch.no_grad():
        logits = m(input_ids=ids, use_cache=False).logits
    out[name] = {"logits": logits, "parameters": sum(p.numel() for p in m.parameters())}
assert not any(k.startswith("megatron") for k in sys.modules), "transformers alone"
torch.save(out, out_file)
"""


def _load_with_transformers_alone(directory, names, ids, tmp_path):
    """Load each budget in a fresh Python that imports transformers and nothing of this package (the checkpoint's
    remote code runs), returning its logits on ``ids`` and parameter count."""
    import subprocess
    import sys

    ids_file, out_file = str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")
    torch.save(ids, ids_file)
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, directory, ",".join(names), ids_file, out_file],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out_file)
