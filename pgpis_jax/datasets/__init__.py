"""Dataset formats and generators shared by the TFDS builders in data/.

- `formats`: readers (and writers) of the annotation layouts the methods' releases use: the DPTN / CFLD / NTED
  DeepFashion layout, the PATN / PIDM Market-1501 layout, and the PCDMs / FPDM JSON-pairs + keypoint-txt layout.
- `records`: the pair records every builder writes (features, image preparation, bad-input handling).
- `synthetic`: procedurally generated people (no download), written in the same layouts.
"""
