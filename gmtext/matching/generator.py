"""generator=gradmm: the default generator, gradient matching against a release.

A marker component: its settings are the matcher, projector, privacy and matched_params
groups, which the generate stage reads as it always did. What other stages ask a generator
(does it need a release first?) it answers here, so they never branch on its name.
"""

from __future__ import annotations


class GRADMMGenerator:
    name = "gradmm"
    uses_release = True  # gmtext-pipeline makes the release before generating
