"""Drafting: everything that decides, proposes and learns what a step drafts.

    plan.py       DraftPlan: what one sequence drafts in one step (off, n-gram, layer
                  draft, or the n-gram proposal continued by the layer draft), and the
                  plans of the fixed modes
    ngram.py      prompt lookup, consulted when a step is planned
    proposer.py   Proposer, the interface of drafters that run a model, and Drafts, what
                  every draft hands to verification
    layer.py      the layer draft (`skip`, `early_exit`), a Proposer
    policy.py     the `auto` policy: the choice of plan and what it learns from (per
                  sequence acceptance, measured costs, telemetry)
    costs.py      measured step costs per batch bucket
    telemetry.py  what was drafted and kept, for the fleet and the metrics
    step.py       the speculative step: plan, draft, verify, accept, learn
    forced.py     teacher-forced agreement of a draft with the full model
    tune.py       the offline skip-set search (`selfspec tune`)

Model passes all run in `services.engine.runner.ModelRunner`. A new drafter, such as
a small draft model, is a Proposer in a file of its own. The speedup model that `auto`
ranks drafts with is `services.common.speedup`, torch-free, shared with the tuner and
the fleet controller.
"""
