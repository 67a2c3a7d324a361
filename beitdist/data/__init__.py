"""Data side of beitdist: turning images and label maps into model inputs (see `processor`)."""
