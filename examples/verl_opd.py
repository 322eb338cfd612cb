"""One top-k OPD update through verl's own registries, without GPUs or Ray workers.

Tiny random Llama student and teacher; the student samples a response, then the steps a verl trainer with the
reference fork's actor runs: rewards (compute_opd_rewards), advantages (verl's get_adv_estimator_fn), the
policy loss on the set's log-probs (verl's get_policy_loss_fn) and one optimizer step.

    .venv/bin/python examples/verl_opd.py --strategy union --weight-mode student_p
"""
from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opdcore.integrations import verl as opd_verl


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategy", default="only_stu", choices=opd_verl.FORK_STRATEGIES)
    ap.add_argument("--weight-mode", default="student_p", choices=opd_verl.FORK_WEIGHT_MODES)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--loss-agg-mode", default="token-mean", choices=opd_verl.LOSS_AGG_MODES)
    args = ap.parse_args(argv)

    from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn
    from verl.workers.config import FSDPActorConfig

    opd_verl.register()
    cfg = opd_verl.VerlOPDConfig(log_prob_top_k=args.top_k, top_k_strategy=args.strategy,
                                 reward_weight_mode=args.weight_mode, loss_agg_mode=args.loss_agg_mode,
                                 loss_scale_factor=16)
    torch.manual_seed(0)
    mcfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2)
    student, teacher = LlamaForCausalLM(mcfg), LlamaForCausalLM(mcfg).eval()

    prompt_len, resp_len, B = 6, 16, 3
    prompts = torch.randint(0, mcfg.vocab_size, (B, prompt_len))
    with torch.no_grad():
        seqs = student.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=resp_len,
                                min_new_tokens=resp_len, do_sample=True, top_k=0, pad_token_id=0)
    response_mask = torch.ones(B, resp_len, dtype=torch.bool)
    response_mask[1, 10:] = False  # a shorter response
    pred = slice(prompt_len - 1, prompt_len - 1 + resp_len)  # positions whose logits predict the response

    def student_logprobs():
        return torch.log_softmax(student(seqs).logits[:, pred].float(), -1)  # [B, T, V]

    with torch.no_grad():  # rollout-time scoring: the student's top-k, the teacher on the same ids (and its own)
        ls = student_logprobs()
        lt = torch.log_softmax(teacher(seqs).logits[:, pred].float() / cfg.teacher_temperature, -1)
        s_lp, s_ids = ls.topk(cfg.log_prob_top_k, -1)
        t_lp, t_ids = lt.topk(cfg.log_prob_top_k, -1)
        out = opd_verl.compute_opd_rewards(
            cfg, response_mask, student_top_k_ids=s_ids, student_top_k_log_probs=s_lp,
            teacher_on_student_log_probs=lt.gather(-1, s_ids), teacher_top_k_ids=t_ids, teacher_top_k_log_probs=t_lp,
            student_log_probs_on_teacher_ids=ls.gather(-1, t_ids))

    adv, _ = get_adv_estimator_fn(opd_verl.ADV_ESTIMATOR_NAME)(token_level_rewards=out.rewards,
                                                                response_mask=response_mask, config=None)
    actor_cfg = FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                                loss_agg_mode=cfg.loss_agg_mode, loss_scale_factor=cfg.loss_scale_factor)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    # the fork's actor: re-score the set ids with gradient, old log-probs = the rollout-time ones
    log_prob = student_logprobs().gather(-1, out.ids)
    pg_loss, metrics = get_policy_loss_fn(opd_verl.POLICY_LOSS_NAME)(
        old_log_prob=out.student_log_probs, log_prob=log_prob, advantages=adv, response_mask=response_mask,
        loss_agg_mode=cfg.loss_agg_mode, config=actor_cfg, rollout_is_weights=None)
    opt.zero_grad()
    pg_loss.backward()
    opt.step()
    with torch.no_grad():
        after = opd_verl.compute_opd_rewards(
            cfg, response_mask, student_top_k_ids=s_ids, student_top_k_log_probs=student_logprobs().gather(-1, s_ids),
            teacher_on_student_log_probs=lt.gather(-1, s_ids), teacher_top_k_ids=t_ids, teacher_top_k_log_probs=t_lp,
            student_log_probs_on_teacher_ids=student_logprobs().gather(-1, t_ids))
    mean_reward = lambda o: float(o.token_rewards[response_mask].mean())  # noqa: E731
    result = {"pg_loss": pg_loss.item(), "opdcore_loss": metrics["actor/opdcore_loss"],
              "reward_before": mean_reward(out), "reward_after": mean_reward(after),
              "set_size": float(out.valid.sum(-1)[response_mask].float().mean())}
    print(f"{cfg.top_k_strategy}/{cfg.reward_weight_mode} (kernel weights {cfg.weight_mode}): "
          f"pg_loss {result['pg_loss']:+.4f}  opdcore loss {result['opdcore_loss']:+.4f}  "
          f"mean token reward {result['reward_before']:+.4f} -> {result['reward_after']:+.4f}  "
          f"set size {result['set_size']:.1f}")
    return result


if __name__ == "__main__":
    main()
