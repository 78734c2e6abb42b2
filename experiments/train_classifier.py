"""Trains a classifier and reports its clean test accuracy
(`aigc_jax.eval.classifiers.train_classifier`).

  python experiments/train_classifier.py \
    --config=experiments/configs/train_classifier.py[:variant] --workdir=DIR

Re-running the same command in the same workdir resumes from the last
checkpoint.
"""

from aigc_jax import launch
from aigc_jax.eval import classifiers

if __name__ == "__main__":
  launch.main(classifiers.train_classifier, __file__)
