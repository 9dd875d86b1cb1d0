"""``fieldlib gradcheck``: verify the mean-field gradients against exact inference.

Builds random toy temporal fields (a few frames of block states, a latent intent, a
Gaussian kernel; fieldlib.inference.check.toy_temporal_field) and prints one table with:

1. closed-form mean-field gradients (MATH.md §6, Eq. 7-9) vs autograd of the surrogate, in
   the sequence and the per-frame form: must agree to rounding;
2. mean-field vs exact gradients of the NLL with the coupling off (µ = 0, φXI = 0): must
   agree to rounding (mean-field is exact there), and ELBO = log Z;
3. the same with the coupling on: reported with the marginal error, only ELBO <= log Z
   must hold;
4. the asynchronous step (Algorithm 2, MATH.md §5): with every other frame's current
   marginals in the store (d = 1, h = the number averaged) its gradients equal the
   per-frame closed forms (must hold); beside it, the deviation with d = 0.9 and messages
   k training steps old (--async-steps-old; reported, not checked).

A parameter whose factor type has no closed-form gradient (a user's type without
``energy_gradient``) gets a "no closed form" row: reported, not checked.

Exit code 0 when every must-hold row holds, 1 otherwise.
"""

from __future__ import annotations

from fieldlib.cli import command_help

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "gradcheck",
        help=command_help("gradcheck"),
        description=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the first trial (default 0)")
    p.add_argument("--trials", type=int, default=3, help="number of random fields (default 3)")
    p.add_argument("--l2-intent", type=float, default=4e-4,
                   help="weight of the L2 pull of φXI toward zero (default 4e-4, the paper's)")
    p.add_argument("--async-steps-old", type=int, nargs="*", default=[1, 5], metavar="K",
                   help="ages (in SGD steps of lr 0.1) of the stored messages in the reported "
                        "asynchronous rows (default 1 5)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from fieldlib.errors import FieldlibError
    from fieldlib.inference import get_engine
    from fieldlib.inference.check import (
        NO_CLOSED_FORM,
        CheckReport,
        compare,
        compare_asynchronous,
        compare_closed_form,
        toy_temporal_field,
    )

    if args.trials < 1:
        raise FieldlibError("--trials must be at least 1")
    from tqdm import tqdm

    report = CheckReport()
    # a progress bar on stderr when it is a terminal (disable=None), silent in logs and tests
    for k in tqdm(range(args.trials), desc="gradcheck trials", unit="field", disable=None):
        seed = args.seed + k
        graph, params, labels = toy_temporal_field(seed, dtype=torch.float64)
        trial = compare_closed_form(graph, labels, params=params, l2_intent=args.l2_intent)
        off_graph, off_params, off_labels = toy_temporal_field(seed, coupling=False)
        trial.extend(compare(off_graph, off_labels, params=off_params,
                             l2_intent=args.l2_intent, expect_exact=True,
                             name="meanfield vs exact, coupling off"))
        trial.extend(compare(graph, labels, params=params, l2_intent=args.l2_intent,
                             name="meanfield vs exact, coupling on"))
        # loopy BP beside mean-field: exact with the coupling off, reported with it on
        bp = get_engine("bp", tol=1e-12, max_iter=500, damping=0.3)
        trial.extend(compare(off_graph, off_labels, params=off_params, engine=bp,
                             l2_intent=args.l2_intent, expect_exact=True,
                             name="bp vs exact, coupling off"))
        trial.extend(compare(graph, labels, params=params, l2_intent=args.l2_intent,
                             engine=bp, name="bp vs exact, coupling on"))
        trial.extend(compare_asynchronous(graph, labels, params=params,
                                          l2_intent=args.l2_intent,
                                          steps_old=tuple(args.async_steps_old)))
        for row in trial.rows:
            row.check = f"[{seed}] {row.check}"
        report.extend(trial)
    print(report.table())
    failed = sum(1 for r in report.rows if r.must_hold and not r.ok)
    held = sum(1 for r in report.rows if r.must_hold)
    unchecked = sum(1 for r in report.rows if r.note == NO_CLOSED_FORM)
    print(f"\n{held - failed}/{held} must-hold checks hold over {args.trials} trial(s)"
          f"{'' if not failed else f'; {failed} FAILED'}"
          f"{'' if not unchecked else f'; {unchecked} rows with no closed form (not checked)'}")
    return 0 if report.ok else 1
