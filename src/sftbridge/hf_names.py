"""The names transformers accepts for ``train.optim``, ``train.lr_scheduler``, ``model.attn_implementation``.

Committed copies, so that the config is checked before anything heavy loads: importing transformers costs
seconds, and a typo must be refused at once. ``tests/test_preflight.py`` keeps each list equal to the
installed transformers' own (``OptimizerNames``, ``SchedulerType``, ``AttentionInterface``); when transformers
is upgraded and that test fails, copy the new names from its message.
"""

from __future__ import annotations

import difflib
import re

# transformers.training_args.OptimizerNames (5.24.0)
OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_torch_xla",
    "adamw_torch_npu_fused",
    "adafactor",
    "adamw_anyprecision",
    "adamw_torch_4bit",
    "adamw_torch_8bit",
    "ademamix",
    "sgd",
    "adagrad",
    "adamw_bnb_8bit",
    "adamw_8bit",
    "ademamix_8bit",
    "lion_8bit",
    "lion_32bit",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "paged_ademamix_32bit",
    "paged_ademamix_8bit",
    "paged_lion_32bit",
    "paged_lion_8bit",
    "rmsprop",
    "rmsprop_bnb",
    "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit",
    "galore_adamw",
    "galore_adamw_8bit",
    "galore_adafactor",
    "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise",
    "galore_adafactor_layerwise",
    "lomo",
    "adalomo",
    "grokadamw",
    "schedule_free_radam",
    "schedule_free_adamw",
    "schedule_free_sgd",
    "apollo_adamw",
    "apollo_adamw_layerwise",
    "stable_adamw",
)

# transformers.trainer_utils.SchedulerType (5.24.0)
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
)

# "eager" + transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS.valid_keys() (5.24.0); a kernel from the Hub
# ("org/repo[@revision][:function]", transformers' is_kernel) is accepted too.
ATTN_IMPLEMENTATIONS = (
    "eager",
    "flash_attention_4",
    "flash_attention_3",
    "flash_attention_2",
    "flex_attention",
    "sdpa",
    "paged|eager",
)
HUB_KERNEL = re.compile(r"^[^/:]+/[^/:]+(?:@[^/:]+)?(?::[^/:]+)?$")  # transformers.integrations.hub_kernels


def check_name(value: str, valid: tuple[str, ...], what: str) -> str:
    """``value`` if it is one of ``valid``; else ValueError naming the nearest valid name (or all of them)."""
    if value in valid:
        return value
    close = difflib.get_close_matches(value, valid, n=1, cutoff=0.5)
    if close:
        raise ValueError(f"not a transformers {what}; did you mean {close[0]!r}?")
    raise ValueError(f"not a transformers {what}; valid: {', '.join(valid)}")
