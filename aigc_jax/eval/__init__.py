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
- `text_to_image`: a text-to-image UNet fine-tuned on a captioned set, its
  samples of the prompted classes scored (concept success).
- `contrastive`: a contrastive encoder trained on a set, scored by a linear
  probe.
- `purifiers`: diffusion purification (LE's JCDP, AVATAR-style) as the
  attacker's countermeasure, with its learnable manifold.
- `runs`: another experiment's finished run and its sets, read back.
"""
