"""The public kernel API: Python functions over torch.ops.opdcore.*, usable from any trainer."""
from opdcore import _native  # noqa: F401  (loads the extension, registering the ops)
from opdcore.ops import _fake  # noqa: F401
from opdcore.ops.dense import DIVERGENCES, dense_divergence, dense_divergence_linear_weighted
from opdcore.ops.loss import (
    WEIGHT_MODES,
    OPDLoss,
    opd_rewards,
    opd_topk_loss,
    opd_topk_loss_linear,
    opd_topk_loss_linear_weighted,
    renorm_topk_kl,
    renorm_topk_kl_linear,
    weight_mode_index,
)
from opdcore.ops.policy import PPOLoss, ppo_coefficients, ppo_topk_loss, ppo_topk_loss_linear_weighted
from opdcore.ops.sampling import Sample, sample_tokens
from opdcore.ops.tail_kl import TailKL, tail_topk_kl, tail_topk_kl_linear_weighted
from opdcore.ops.token_set import (STRATEGIES, STRATEGY_ALIASES, TokenSet, build_token_set, canonical_strategy,
                                   set_is_student_topk)
from opdcore.ops.topk import DEFAULT_BLOCK_ELEMENTS, StreamResult, StreamState, TopK, linear_topk, logprobs_at, topk_logprobs
