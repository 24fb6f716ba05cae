"""Karyo's segmentation engine (no Django imports; see docs/ml_worker.md).

Kept deliberately empty of imports so that numpy-only modules (metrics, synth, stain...)
do not pull in torch when imported.
"""

__all__: list[str] = []
