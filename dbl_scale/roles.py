"""Branch roles, the words checkpoints record. Branches are listed anchor first; the last
(`TARGET`) is the target, the model a run keeps, evaluates and exports. A branch is
  TRAINED  its own DeepSpeed engine and optimizer;
  EMA      a momentum copy: an exponential moving average of the target, no gradient;
  FROZEN   a trained checkpoint (offline DBL anchor, a teacher), no gradient."""

TRAINED, EMA, FROZEN = "trained", "ema", "frozen"
TARGET = -1  # the target is the last branch: branches[TARGET], outs[TARGET], terms[TARGET]
