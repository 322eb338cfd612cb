"""The training objectives of OPD (METHOD.md section 2) on plain tensors, for opdcore's trainer and any other.

    spec = ObjectiveSpec(loss="reward_weighted", topk=16, strategy="student")
    out = make_objective(spec)(FusedHead(hidden, lm_head_weight), Terms(ids, teacher_logprobs, valid, weights))
    out.loss.backward()
"""
from opdcore.objectives.aggregation import AGGREGATIONS, aggregate, aggregation_weights, check_aggregation
from opdcore.objectives.heads import FusedHead, LMHead, LogitsHead, ShardHead
from opdcore.objectives.objective import (LossOut, Objective, Terms, advantages, make_objective,
                                          set_is_scored_student_topk, token_set)
from opdcore.objectives.spec import LOSSES, ObjectiveSpec, default_weight_mode
