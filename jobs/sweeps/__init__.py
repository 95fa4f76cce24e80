"""Sweeps on Ray Tune: the space file, one trial (a Train run inside a Tune function), the Tuner, the results."""
