"""``fedseal-sim audit-privacy``: an empirical lower bound on a run's epsilon, from one run.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run"
(NeurIPS 2023): plant ``m`` canaries, each included independently with
probability 1/2, train once, guess membership from the trained model, and
turn the number of correct guesses into a lower bound on epsilon at a stated
confidence.

* :mod:`~simulations.privacy_audit.bound` -- the statistics (pure, scipy);
* :mod:`~simulations.privacy_audit.canaries` -- canary design, inclusion,
  planting into a site's data file, guesses (pure, numpy);
* :mod:`~simulations.privacy_audit.audit` -- one audited run through the
  simulation engine, scored on the run's final global model;
* :mod:`~simulations.privacy_audit.cli` -- the command.
"""
