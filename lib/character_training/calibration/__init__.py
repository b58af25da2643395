"""Known-truth simulations of the evaluation machinery (`python -m character_training calibrate`).

Each headline statistic of notebooks 07-09 is computed, with the project's own estimator
functions, on simulated experiments whose truth is set by hand: scripted models with known
preferences and scripted judges with known nuisances (a position bias, a taste for some words,
a leaning that survives reading a reply at another strength). Over many repetitions that gives
each statistic's false-positive rate, the coverage of its interval and the effect it detects
with 80% power, at a preset's actual sample sizes.
"""
