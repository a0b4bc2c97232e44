"""Drafting: everything that decides, proposes and learns what a step drafts.

    plan.py       DraftPlan: what one sequence drafts in one step (off, n-gram, layer
                  draft, the n-gram proposal continued by the layer draft, or the draft
                  model), and the plans of the fixed modes
    ngram.py      prompt lookup, consulted when a step is planned
    proposer.py   Proposer, the interface of drafters that run a model, and Drafts, what
                  every draft hands to verification
    layer.py      the layer draft (`skip`, `early_exit`), a Proposer
    draft_model.py  a separate draft model (`model`), a Proposer with a KV pool of
                  its own
    retokenize.py  its drafts across tokenizers: the target's text in the draft's ids
                  and back
    policy.py     the `auto` policy: the choice of plan and what it learns from (per
                  sequence acceptance, measured costs, telemetry)
    costs.py      measured step costs per batch bucket
    telemetry.py  what was drafted and kept, for the fleet and the metrics
    step.py       the speculative step: plan, draft, verify, accept, learn
    forced.py     teacher-forced agreement of a draft with the full model
    tune.py       the offline skip-set search (`selfspec tune`)

The target's passes all run in `services.engine.runner.ModelRunner`; a draft model's
run in `draft_model.py`, on its own KV. A new drafter is a Proposer in a file of its
own. The speedup model that `auto` ranks drafts with is `services.common.speedup`,
torch-free, shared with the tuner and the fleet controller.
"""
