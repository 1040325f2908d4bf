"""Load tests for Switchboard: prove cross-process group delivery, measure it, compare it.

``python -m loadtests --help`` (or the ``switchboard-loadtest`` script); see loadtests/README.md.
"""
