"""Nemotron Elastic, the method (arXiv 2511.16664), read top to bottom:

* ``arch.py``, ``cost.py``, ``budget.py``: one sub-model (per-layer sizes, skipped layers) and what it costs in
  each budget kind (parameters, serving memory, FLOPs per token); ``memory.py``: the per-GPU memory model;
* ``layers/``: the elastic Megatron-Core blocks that run any nested choice on sliced weights (linears, Mamba
  mixer, attention, MLP, stack; ``spec.py`` their ModuleSpec; ``model.py``: ``build_elastic_model``, ``set_arch``);
* ``space.py``: what may be chosen: the allowed sizes of every axis and the depth ranking;
* ``router.py``: the router: per-axis Gumbel-Softmax choices from a budget, drawn nested for every budget;
* ``resource_loss.py``: the expected cost of the router's choices against the budget;
* ``curriculum.py``: the two-stage curriculum (tokens, context, batch and budget weights per stage);
* ``distill.py``, ``teacher.py``: the KD loss against the frozen sorted parent;
* ``config.py``: the elastic job config (budgets, space, router, distillation, curriculum);
* ``memory_check.py``: an elastic job's per-GPU memory at every stage against the GPU's;
* ``components.py`` -> ``step.py`` -> ``run.py``: the elastic training run along its data flow: built (student,
  frozen teacher, optimizers, router), one optimizer step (budgets per micro-batch, nested draws, KD, the router's
  resource step), the loop (``train_elastic`` drives an ``ElasticRun``: resume, save, stop); ``report.py``: its
  start, validation and summary;
* ``choose.py``: after training, every budget's sub-model (trained, or zero-shot between trained ones; in any cost
  kind); ``slicing.py``: carving that sub-model's tensors out of the parent's (every budget is a prefix);
  ``source.py``: opening a trained checkpoint with its router: what ``extract``, ``evaluate`` and ``generate`` use.

Importance and the sort that precede it are in ``importance/``; the export formats in ``extraction/``.
"""
