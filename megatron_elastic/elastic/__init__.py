"""Nemotron Elastic, the method (arXiv 2511.16664), read top to bottom:

* ``space.py``: what may be chosen: the allowed sizes of every axis and the depth ranking (the architecture and
  its costs: ``model/elastic_arch.py``, ``model/cost.py``, ``model/budget.py``; the elastic blocks that run a
  choice: ``model/elastic_*.py``);
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
  kind) and opening an elastic checkpoint with its router: what ``extract``, ``evaluate`` and ``generate`` use.

Importance and the sort that precede it are in ``importance/``; extracting a budget's sub-model in ``extraction/``.
"""
