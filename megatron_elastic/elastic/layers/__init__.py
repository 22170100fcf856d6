"""The elastic Megatron-Core blocks: linears, Mamba mixer, attention, MLP and stack that run any nested choice on
sliced weights; ``spec.py`` their ModuleSpec, ``model.py`` ``build_elastic_model`` and ``set_arch``."""
