"""Evaluators: what experiments measure, as functions a researcher can call
in their own loop (cf. big_vision's evaluators).

- `classifiers`: build, train (resumably), restore and apply the classifiers
  of real data that score victims and generated samples.
- `victims`: a classifier trained on (protected) data under a countermeasure
  (ISS, adversarial training, UEraser), scored by its clean test accuracy.
- `ddpm`: a pixel DDPM trained on a set, sampled, and scored in a
  classifier's feature space (and the DDPM's build, training and sampling).
- `features`: the FID Inception-v3 and the LPIPS backbones' ImageNet
  features, as feature extractors for distribution scores.
"""
