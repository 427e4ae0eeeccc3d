"""One module per experiment, ``eNN_name.py``, each with ``nnsight_version`` and ``ts_version``.

``nnsight_version(lm, ids, f)`` takes ``nnsight.NNsight(hf_model)``; ``ts_version(model,
ids, f, run)`` takes the wrapped model (``ts.wrap(hf_model)``, or its conversion where the
module sets ``CONVERTED = True``) and ``run(target, *inputs, **options)``, which runs one
request — ``ts.plans.execute`` on the base here, ``Client.run`` on a host. ``target`` is a
plan, a rewritten model or a session; a rewritten model's ``generate`` (options
``max_new_tokens=``, ...: ``ts.run(model.generate, ...)``, ``Client.generate`` on a host); or
a training loop, ``ts.training(...)`` (``ts.train``, with ``backend=`` on a host). ``f`` is
the family's :class:`~parity.families.Family`. Both return a dict of the numbers compared.
nnsight reads the source of each ``with`` block it runs, so these live in files.
"""

EXPERIMENTS = (
    "e01_save_ops",
    "e02_steer_direction",
    "e03_cross_prompt_patch",
    "e04_module_inputs",
    "e05_attention_heads",
    "e06_early_stop",
    "e07_session",
    "e08_cache",
    "e09_logit_lens",
    "e10_conditional_edit",
    "e11_ioi_patching",
    "e12_function_vectors",
    "e13_sae_ablation",
    "e14_stop_layer",
    "e15_gradients",
    "e16_attribution_patching",
    "e17_generation_steps",
    "e18_steered_generation",
    "e19_lora_training",
)
