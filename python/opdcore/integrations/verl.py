"""opdcore's top-k OPD reward, advantage and policy loss, registered in verl's own registries (verl 0.9.1).

    from opdcore.integrations import verl as opd_verl
    opd_verl.register()   # explicit and idempotent; in every process that looks the names up (see below)

then in the verl config (examples/verl_opd.yaml):

    algorithm.adv_estimator=opdcore_token_reward
    actor_rollout_ref.actor.policy_loss.loss_mode=opdcore_topk_opd

The pieces (METHOD.md 2.1-2.3, with the reference fork's names):

* `VerlOPDConfig`: log_prob_top_k, top_k_strategy (only_stu / only_tch / intersection / union /
  union-intersection), reward_weight_mode (student_p / teacher_p / none), teacher_temperature, loss_agg_mode,
  loss_scale_factor; `VerlOPDConfig.from_verl(cfg)` reads them from a verl config.
* `compute_opd_rewards`: the fork's distillation reward from the student's top-k log-probs and the teacher's
  log-probs on the same ids -> token-level rewards [B, T, K] (r = -w (log p - log q), 0 outside the set), their
  per-token sums, the set's ids in the rewards' layout and the rollout-time log-probs on them.
* `opdcore_token_reward` (verl's register_adv_est): advantages = rewards * response_mask, the fork's
  "token_reward_direct" (no baseline, no discount), for [B, T] and [B, T, K] rewards.
* `opdcore_topk_opd` (verl's register_policy_loss): the PPO surrogate per set id summed over the set, then
  aggregated like verl's agg_loss (all five loss_agg_modes, with verl's global batch normalisers).

Shapes, honestly: stock verl 0.9.1's actor (verl.workers.utils.losses.ppo_loss) passes log-probs of the sampled
token only, [B, T]; with it only sampled-token OPD works (log_prob_top_k = 0: rewards [B, T] = log q - log p on the
sampled token). The top-k loss needs log p on the K set ids, [B, T, K], recomputed with gradient by the actor on
`OPDRewards.ids`: the reference fork's modified dp_actor.update_policy does that (and passes [B, T, K] old
log-probs and advantages); stock verl does not, and the policy loss says so instead of broadcasting silently.

Values: with one update per batch (ratio 1) the returned pg_loss is the fork's value, sum_set w*l = -sum of the
rewards (aggregated); opdcore's loss value -sum sg(r) log p has the same gradient and is logged as
"actor/opdcore_loss".

Fidelity to the fork: for union-intersection the fork does not renormalise the weights over the set (raw p, raw
q, and 1 per id for "none"); VerlOPDConfig maps these to opdcore's student_p_raw / teacher_p_raw / none_raw.
For the other strategies "none" is 1/|set| in both.

Ray workers: verl looks the names up in its worker processes too, so register there as well:
VERL_USE_EXTERNAL_MODULES=opdcore.integrations.verl_plugin (verl imports it in every process that imports verl).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping, NamedTuple, Optional

import torch

import opdcore
import opdcore.ops
from opdcore.objectives import aggregation_weights

ADV_ESTIMATOR_NAME = "opdcore_token_reward"
POLICY_LOSS_NAME = "opdcore_topk_opd"
FORK_STRATEGIES = ("only_stu", "only_tch", "intersection", "union", "union-intersection")
FORK_WEIGHT_MODES = ("student_p", "teacher_p", "none")
# verl 0.9.1's agg_loss modes; token-sum is handled here (opdcore's aggregation has no such mode)
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
_RAW = {"student_p": "student_p_raw", "teacher_p": "teacher_p_raw", "none": "none_raw"}
_INSTALL = ("opdcore.integrations.verl needs verl (tested with 0.9.1) and the packages its registries import: "
            "pip install --no-deps verl==0.9.1 && pip install ray==2.55.1 tensordict==0.10.0 omegaconf==2.3.0 "
            "hydra-core==1.3.2 codetiming==1.4.0 (keep your torch pinned on that command line; "
            "scripts/setup.sh does this)")


# ---- configuration -----------------------------------------------------------------------------------------------

def kernel_weight_mode(top_k_strategy: str, reward_weight_mode: str, fork_fidelity: bool = True) -> str:
    """opdcore's kernel weight mode for the fork's (top_k_strategy, reward_weight_mode).

    union-intersection uses raw (unrenormalised) weights in the fork: student_p -> student_p_raw, teacher_p ->
    teacher_p_raw, none -> none_raw (1 per id). fork_fidelity=False keeps opdcore's renormalised weights there.
    opdcore's own names (e.g. student_p_raw) pass through unchanged.
    """
    strategy = canonical_strategy(top_k_strategy)
    modes = opdcore.ops.WEIGHT_MODES
    if reward_weight_mode not in modes:
        raise ValueError(f"reward_weight_mode must be one of {FORK_WEIGHT_MODES} (or opdcore's {modes}), "
                         f"got {reward_weight_mode!r}")
    if not (fork_fidelity and strategy == "symmetric_difference" and reward_weight_mode in _RAW):
        return reward_weight_mode
    raw = _RAW[reward_weight_mode]
    if raw not in modes:
        raise NotImplementedError(
            f"top_k_strategy={top_k_strategy!r} with reward_weight_mode={reward_weight_mode!r} means weight "
            f"{'1 per id' if reward_weight_mode == 'none' else 'the raw probability'} in the reference fork, "
            f"which needs opdcore's weight mode {raw!r}; this opdcore build has only {modes} "
            "(or pass fork_fidelity=False for opdcore's renormalised weights)")
    return raw


def canonical_strategy(top_k_strategy: str) -> str:
    """opdcore's strategy name for a fork (or opdcore) name, with an error naming top_k_strategy."""
    try:
        return opdcore.ops.canonical_strategy(top_k_strategy)
    except ValueError:
        raise ValueError(f"top_k_strategy must be one of {FORK_STRATEGIES} (or opdcore's "
                         f"{opdcore.ops.STRATEGIES}), got {top_k_strategy!r}") from None


@dataclasses.dataclass(frozen=True)
class VerlOPDConfig:
    """The OPD settings, under the reference fork's names (its actor_rollout_ref.rollout.* keys)."""

    log_prob_top_k: int = 16  # 0: sampled-token OPD (METHOD.md 2.1)
    top_k_strategy: str = "only_stu"
    reward_weight_mode: str = "student_p"
    # The teacher's log-probs must be log softmax(teacher logits / teacher_temperature): the teacher scorer
    # applies it (the rewards only see log-probs), so it is carried here for that scorer.
    teacher_temperature: float = 1.0
    loss_agg_mode: str = "token-mean"
    loss_scale_factor: Optional[float] = None  # seq-mean-token-sum-norm's constant (verl: None -> response length)
    log_ratio_clip: float = 0.0  # opdcore's clip of log p - log q (0: off, as in the fork)
    fork_fidelity: bool = True  # union-intersection: the fork's raw weights

    def __post_init__(self):
        if isinstance(self.log_prob_top_k, bool) or not isinstance(self.log_prob_top_k, int) \
                or self.log_prob_top_k < 0:
            raise ValueError(f"log_prob_top_k must be an int >= 0, got {self.log_prob_top_k!r}")
        canonical_strategy(self.top_k_strategy)
        kernel_weight_mode(self.top_k_strategy, self.reward_weight_mode, self.fork_fidelity)
        if not (isinstance(self.teacher_temperature, (int, float)) and self.teacher_temperature > 0):
            raise ValueError(f"teacher_temperature must be > 0, got {self.teacher_temperature!r}")
        check_loss_agg_mode(self.loss_agg_mode)
        if self.loss_scale_factor is not None and not self.loss_scale_factor > 0:
            raise ValueError(f"loss_scale_factor must be > 0 or None, got {self.loss_scale_factor!r}")
        if not self.log_ratio_clip >= 0:
            raise ValueError(f"log_ratio_clip must be >= 0 (0: off), got {self.log_ratio_clip!r}")

    @property
    def strategy(self) -> str:
        """opdcore's name of the strategy (student, teacher, intersection, union, symmetric_difference)."""
        return canonical_strategy(self.top_k_strategy)

    @property
    def weight_mode(self) -> str:
        """The weight mode the kernels get (raw for union-intersection, see kernel_weight_mode)."""
        return kernel_weight_mode(self.top_k_strategy, self.reward_weight_mode, self.fork_fidelity)

    @classmethod
    def from_verl(cls, cfg: Mapping[str, Any]) -> "VerlOPDConfig":
        """Read the settings from a verl config (dict or OmegaConf): a top-level `opdcore` section (for stock verl,
        whose rollout config rejects unknown keys), else actor_rollout_ref.rollout.* (the fork's layout), else the
        mapping itself; loss_agg_mode and loss_scale_factor from actor_rollout_ref.actor when present."""
        def sub(m, *path):
            for key in path:
                if m is None or key not in m:
                    return None
                m = m[key]
            return m

        section = sub(cfg, "opdcore") or sub(cfg, "actor_rollout_ref", "rollout") or cfg
        actor = sub(cfg, "actor_rollout_ref", "actor") or {}
        names = [f.name for f in dataclasses.fields(cls)]
        values = {n: section[n] for n in names if n in section and section[n] is not None}
        for n in ("loss_agg_mode", "loss_scale_factor"):
            if n not in values and n in actor and actor[n] is not None:
                values[n] = actor[n]
        return cls(**values)


def check_loss_agg_mode(loss_agg_mode: str) -> None:
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")


# ---- aggregation: verl's agg_loss on opdcore's aggregation weights -----------------------------------------------

def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str, dp_size: int = 1,
             batch_num_tokens: Optional[float] = None, global_batch_size: Optional[float] = None,
             loss_scale_factor: Optional[float] = None) -> torch.Tensor:
    """verl 0.9.1's agg_loss (same arguments, same value) on opdcore.objectives.aggregation_weights.

    loss_mat, loss_mask [B, T]. batch_num_tokens / global_batch_size are the global batch's token and sequence
    counts (verl's global_batch_info); each rank's sum is scaled by dp_size because data-parallel gradients are
    averaged. seq-mean-token-sum-norm divides by loss_scale_factor (None: T, as verl does).
    """
    check_loss_agg_mode(loss_agg_mode)
    if loss_mat.dim() != 2 or loss_mask.shape != loss_mat.shape:
        raise ValueError(f"loss_mat and loss_mask must both be [B, T], got {tuple(loss_mat.shape)} and "
                         f"{tuple(loss_mask.shape)}")
    mask = loss_mask.to(torch.bool)
    zero = torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device)
    masked = torch.where(mask, loss_mat, zero)  # where, not *: a NaN outside the mask stays out
    if loss_agg_mode == "token-sum":
        return masked.sum() * dp_size
    counts = mask.sum(-1)  # [B] loss tokens per sequence
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            batch_num_tokens = counts.sum()
        num_tokens, num_seqs = float(batch_num_tokens) / dp_size, 1.0
    else:
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            global_batch_size = (counts > 0).sum()
        num_tokens, num_seqs = 1.0, float(global_batch_size) / dp_size
    norm = None
    if loss_agg_mode == "seq-mean-token-sum-norm":
        norm = float(loss_scale_factor) if loss_scale_factor is not None else float(loss_mat.shape[-1])
    seq_len = counts.unsqueeze(-1).expand_as(mask).reshape(-1)
    w = aggregation_weights(seq_len, loss_agg_mode, num_tokens, num_seqs, norm, dtype=loss_mat.dtype)
    return (masked.reshape(-1) * w.to(loss_mat.device)).sum()


# ---- rewards (the fork's compute_distillation_reward) -----------------------------------------------------------

class OPDRewards(NamedTuple):
    rewards: torch.Tensor  # [B, T, K] (top-k) or [B, T] (k = 0): r = -w (log p - log q), 0 outside set / response
    token_rewards: torch.Tensor  # [B, T] sum of the rewards over the set; -token_rewards is the fork's pg_loss
    loss: torch.Tensor  # [B, T] opdcore's per-token loss value -sum_set sg(r) log p at the rollout-time student
    ids: Optional[torch.Tensor]  # [B, T, K] the set's ids in the rewards' layout: what the actor re-scores
    valid: torch.Tensor  # [B, T, K] / [B, T] bool: in the set and in the response
    student_log_probs: torch.Tensor  # log p on ids at rollout time: the old log-probs of further updates
    teacher_log_probs: torch.Tensor  # log q on ids


def _check_logprobs(name: str, t: torch.Tensor, valid: torch.Tensor) -> None:
    bad = valid & ~torch.isfinite(t)
    if bool(bad.any()):
        raise ValueError(f"{name} holds a non-finite value at a set entry inside the response")
    if bool((valid & (t > 1e-3)).any()):  # rounding may leave +1e-7 on a log-prob of 1, not more
        raise ValueError(f"{name} holds a positive log-prob at a set entry (logits instead of log-probs?)")


def compute_opd_rewards(config: VerlOPDConfig, response_mask: torch.Tensor, *,
                        student_top_k_ids: Optional[torch.Tensor] = None,
                        student_top_k_log_probs: Optional[torch.Tensor] = None,
                        teacher_on_student_log_probs: Optional[torch.Tensor] = None,
                        teacher_top_k_ids: Optional[torch.Tensor] = None,
                        teacher_top_k_log_probs: Optional[torch.Tensor] = None,
                        student_log_probs_on_teacher_ids: Optional[torch.Tensor] = None,
                        old_log_probs: Optional[torch.Tensor] = None,
                        teacher_log_probs: Optional[torch.Tensor] = None) -> OPDRewards:
    """The distillation reward of the fork, on opdcore's token set and reward kernel.

    Top-k (config.log_prob_top_k = k > 0), tensors [B, T, k] under the fork's batch keys: student_top_k_ids /
    student_top_k_log_probs (the rollout-time student's top-k), teacher_on_student_log_probs (log q on them);
    for only_tch / intersection / union / union-intersection also teacher_top_k_ids and, except intersection,
    teacher_top_k_log_probs and student_log_probs_on_teacher_ids. Sampled-token OPD (k = 0): old_log_probs and
    teacher_log_probs [B, T] on the sampled tokens. All log-probs full-vocabulary (not renormalised); the
    teacher's at config.teacher_temperature. response_mask [B, T].
    """
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [B, T], got {tuple(response_mask.shape)}")
    mask = response_mask.to(torch.bool)
    B, T = mask.shape
    k = config.log_prob_top_k

    def need(name, t, shape):
        if t is None:
            raise ValueError(f"{name} is required for log_prob_top_k={k}, top_k_strategy={config.top_k_strategy!r}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {list(t.shape)}")
        if t.device != mask.device:
            raise ValueError(f"{name} is on {t.device}, response_mask on {mask.device}")
        return t

    if k == 0:
        slp = need("old_log_probs", old_log_probs, (B, T))
        acc = torch.float64 if slp.dtype == torch.float64 else torch.float32
        slp = slp.detach().to(acc).reshape(-1, 1)
        tq = need("teacher_log_probs", teacher_log_probs, (B, T)).detach().to(acc).reshape(-1, 1)
        valid = mask.reshape(-1, 1)
        ids = None
        weight_mode = "none"  # a one-token set: weight 1, r = log q - log p
    else:
        s = config.strategy
        shape = (B, T, k)
        s_ids = need("student_top_k_ids", student_top_k_ids, shape) if s != "teacher" or student_top_k_ids is not None \
            else None
        t_ids = need("teacher_top_k_ids", teacher_top_k_ids, shape) if s != "student" else None
        uses_student = s != "teacher"
        uses_teacher = s in ("teacher", "union", "symmetric_difference")
        s_lp = need("student_top_k_log_probs", student_top_k_log_probs, shape) if uses_student else None
        t_on_s = need("teacher_on_student_log_probs", teacher_on_student_log_probs, shape) if uses_student else None
        t_lp = need("teacher_top_k_log_probs", teacher_top_k_log_probs, shape) if uses_teacher else None
        s_on_t = need("student_log_probs_on_teacher_ids", student_log_probs_on_teacher_ids, shape) \
            if uses_teacher else None
        ref = s_lp if s_lp is not None else s_on_t
        acc = torch.float64 if ref.dtype == torch.float64 else torch.float32
        flat = lambda t: None if t is None else t.detach().reshape(B * T, k)  # noqa: E731
        # the teacher strategy reads only the teacher's columns: its ids stand in for absent student ids
        ts = opdcore.build_token_set(flat(s_ids if s_ids is not None else t_ids), flat(t_ids), s,
                                     teacher_logprobs_on_student=flat(t_on_s), teacher_topk_logprobs=flat(t_lp))
        # student log-probs in build_token_set's column layout: student columns, teacher columns, or [S | T]
        parts = ([flat(s_lp)] if uses_student and s != "teacher" else []) + ([flat(s_on_t)] if uses_teacher else [])
        slp = (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]).to(acc)
        tq = ts.teacher_logprobs.to(acc)
        ids = ts.ids
        valid = ts.valid & mask.reshape(-1, 1)
        weight_mode = config.weight_mode
    _check_logprobs("student log-probs" if k else "old_log_probs", slp, valid)
    _check_logprobs("teacher log-probs" if k else "teacher_log_probs", tq, valid)
    if slp.shape[0] == 0:
        rewards, loss = torch.zeros_like(slp), torch.zeros(0, dtype=acc, device=slp.device)
    else:
        rewards, loss = opdcore.ops.opd_rewards(slp.contiguous(), tq.contiguous(), valid.contiguous(),
                                                weight_mode=weight_mode, log_ratio_clip=config.log_ratio_clip)
    K = slp.shape[1]
    out_shape = (B, T) if k == 0 else (B, T, K)
    return OPDRewards(rewards=rewards.reshape(out_shape), token_rewards=rewards.sum(-1).reshape(B, T),
                      loss=loss.reshape(B, T), ids=None if ids is None else ids.reshape(B, T, K),
                      valid=valid.reshape(out_shape), student_log_probs=slp.reshape(out_shape),
                      teacher_log_probs=tq.reshape(out_shape))


# ---- the functions verl calls ------------------------------------------------------------------------------------

def compute_token_reward_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                   config: Optional[Any] = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator `opdcore_token_reward` (the fork's token_reward_direct): advantages = returns =
    token_level_rewards * response_mask, [B, T] or [B, T, K] (the mask broadcast over K). No baseline, no
    discount: each token is credited with its own reward (METHOD.md 2.1). verl's optional extras (index,
    reward_baselines) are accepted and unused."""
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [B, T], got {tuple(response_mask.shape)}")
    if token_level_rewards.dim() not in (2, 3) or tuple(token_level_rewards.shape[:2]) != tuple(response_mask.shape):
        raise ValueError(f"token_level_rewards must be [B, T] or [B, T, K] with [B, T] = "
                         f"{list(response_mask.shape)} (response_mask), got {list(token_level_rewards.shape)}")
    with torch.no_grad():
        mask = response_mask.to(token_level_rewards.dtype)
        if token_level_rewards.dim() == 3:
            mask = mask.unsqueeze(-1)
        advantages = token_level_rewards * mask
    return advantages, advantages.clone()


def _cfg(config, key, default):
    if config is None:
        return default
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def compute_policy_loss_opd(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                            response_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
                            config: Optional[Any] = None, rollout_is_weights: Optional[torch.Tensor] = None,
                            format_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy loss `opdcore_topk_opd`, called as verl 0.9.1's actor calls every policy loss (keywords
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights; the fork's
    actor adds format_mask, a per-sequence 0/1 [B] or [B, 1] that drops whole sequences).

    log_prob / old_log_prob / advantages: [B, T] (sampled-token OPD, stock verl) or [B, T, K] on the set ids
    (top-k, the fork's actor). Per set id the PPO surrogate with verl's clip settings (clip_ratio_low/high,
    dual clip clip_ratio_c), summed over the set, times rollout_is_weights, aggregated like verl's agg_loss with
    config.global_batch_info. Returns (pg_loss, metrics); metrics["actor/opdcore_loss"] is opdcore's value
    -sum sg(coefficient) log p of the same gradient (at ratio 1 the coefficient is the reward).
    """
    check_loss_agg_mode(loss_agg_mode)
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [B, T], got {tuple(response_mask.shape)}")
    if log_prob.dim() not in (2, 3) or tuple(log_prob.shape[:2]) != tuple(response_mask.shape):
        raise ValueError(f"log_prob must be [B, T] or [B, T, K] with [B, T] = {list(response_mask.shape)} "
                         f"(response_mask), got {list(log_prob.shape)}")
    if advantages.shape != log_prob.shape:
        if advantages.dim() == 3 and log_prob.dim() == 2:
            raise ValueError(
                f"advantages are [B, T, K] = {list(advantages.shape)} (top-k OPD) but log_prob is [B, T] = "
                f"{list(log_prob.shape)}: this actor scores only the sampled token (stock verl 0.9.1). The top-k "
                "loss needs log p on the K set ids (OPDRewards.ids), as the reference fork's actor computes; "
                "with stock verl use log_prob_top_k=0")
        raise ValueError(f"advantages must have the shape of log_prob {list(log_prob.shape)}, "
                         f"got {list(advantages.shape)}")
    if old_log_prob.shape != log_prob.shape:
        raise ValueError(f"old_log_prob must have the shape of log_prob {list(log_prob.shape)}, "
                         f"got {list(old_log_prob.shape)}")
    if rollout_is_weights is not None and tuple(rollout_is_weights.shape) != tuple(response_mask.shape):
        raise ValueError(f"rollout_is_weights must be [B, T] = {list(response_mask.shape)}, "
                         f"got {list(rollout_is_weights.shape)}")

    clip = _cfg(config, "clip_ratio", 0.2)
    low, high = _cfg(config, "clip_ratio_low", clip), _cfg(config, "clip_ratio_high", clip)
    dual = _cfg(config, "clip_ratio_c", 3.0)
    if not dual > 1.0:
        raise ValueError(f"clip_ratio_c (the dual-clip bound) must be > 1, got {dual}")
    info = dict(_cfg(config, "global_batch_info", {}))
    if info.get("loss_scale_factor") is None:
        info["loss_scale_factor"] = _cfg(config, "loss_scale_factor", None)

    mask = response_mask.to(torch.bool)
    if format_mask is not None:
        if format_mask.numel() != mask.shape[0]:
            raise ValueError(f"format_mask must be [B] or [B, 1] with B = {mask.shape[0]}, "
                             f"got {list(format_mask.shape)}")
        mask = mask & format_mask.reshape(-1, 1).to(torch.bool)
    adv = advantages.detach().to(log_prob.dtype)
    # the PPO surrogate per id, as verl's vanilla loss writes it (its log-ratio clamp included)
    log_ratio = torch.clamp(log_prob - old_log_prob.detach().to(log_prob.dtype), min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    clipped = torch.maximum(pg1, pg2)
    pg3 = -adv * dual
    per_id = torch.where(adv < 0, torch.minimum(pg3, clipped), clipped)
    # opdcore's form: the coefficient d(-per_id)/d log p is A * rho where no clip holds, else 0
    with torch.no_grad():
        active = (pg1 >= pg2) & ~((adv < 0) & (clipped > pg3))
        coef = torch.where(active, adv * ratio, torch.zeros_like(adv))
        opd_per_id = -coef * log_prob.detach()
    per_token, opd_token = per_id, opd_per_id
    if log_prob.dim() == 3:
        per_token, opd_token = per_id.sum(-1), opd_per_id.sum(-1)
    if rollout_is_weights is not None:
        w = rollout_is_weights.detach().to(per_token.dtype)
        per_token, opd_token = per_token * w, opd_token * w
    pg_loss = agg_loss(per_token, mask, loss_agg_mode, **info)

    with torch.no_grad():
        m = mask.unsqueeze(-1).expand_as(log_prob) if log_prob.dim() == 3 else mask
        mf = m.to(log_prob.dtype)
        denom = mf.sum().clamp(min=1)
        kl_tok = -log_ratio.sum(-1) if log_prob.dim() == 3 else -log_ratio
        metrics = {
            "actor/pg_clipfrac": float(((pg2 > pg1).to(mf.dtype) * mf).sum() / denom),
            "actor/ppo_kl": float(torch.where(mask, kl_tok, 0).sum() / mask.sum().clamp(min=1)),
            "actor/pg_clipfrac_lower": float((((clipped > pg3) & (adv < 0)).to(mf.dtype) * mf).sum() / denom),
            "actor/opdcore_loss": float(agg_loss(opd_token, mask, loss_agg_mode, **info)),
        }
    return pg_loss, metrics


# ---- registration ------------------------------------------------------------------------------------------------

def _core_algos():
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as e:
        raise ImportError(f"{_INSTALL}; importing verl.trainer.ppo.core_algos failed: {e}") from e
    return core_algos


def register() -> None:
    """Register `opdcore_token_reward` (register_adv_est) and `opdcore_topk_opd` (register_policy_loss) in verl.

    Idempotent; raises ValueError if another function already holds one of the names (verl's policy-loss
    registry would overwrite it silently) and ImportError, saying what to install, if verl is missing.
    """
    core_algos = _core_algos()
    version = getattr(__import__("verl"), "__version__", "?")
    if not str(version).startswith("0.9."):
        warnings.warn(f"opdcore.integrations.verl was written against verl 0.9.1's policy-loss call; "
                      f"found verl {version}", stacklevel=2)
    for registry, name, fn in ((core_algos.ADV_ESTIMATOR_REGISTRY, ADV_ESTIMATOR_NAME, compute_token_reward_advantage),
                               (core_algos.POLICY_LOSS_REGISTRY, POLICY_LOSS_NAME, compute_policy_loss_opd)):
        if registry.get(name, fn) is not fn:
            raise ValueError(f"verl already has a different function registered as {name!r}: {registry[name]}")
    core_algos.register_adv_est(ADV_ESTIMATOR_NAME)(compute_token_reward_advantage)
    core_algos.register_policy_loss(POLICY_LOSS_NAME)(compute_policy_loss_opd)


def is_registered() -> bool:
    """Whether this process's verl registries hold opdcore's functions (False when verl is not importable)."""
    try:
        core_algos = _core_algos()
    except ImportError:
        return False
    return (core_algos.ADV_ESTIMATOR_REGISTRY.get(ADV_ESTIMATOR_NAME) is compute_token_reward_advantage
            and core_algos.POLICY_LOSS_REGISTRY.get(POLICY_LOSS_NAME) is compute_policy_loss_opd)


__all__ = ["ADV_ESTIMATOR_NAME", "POLICY_LOSS_NAME", "FORK_STRATEGIES", "FORK_WEIGHT_MODES", "LOSS_AGG_MODES",
           "VerlOPDConfig", "OPDRewards", "kernel_weight_mode", "canonical_strategy", "agg_loss",
           "compute_opd_rewards", "compute_token_reward_advantage", "compute_policy_loss_opd", "register",
           "is_registered"]
