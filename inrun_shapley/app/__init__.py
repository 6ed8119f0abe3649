"""What a person runs: the ``inrun-shapley`` command line (``cli``), the demo and the plots."""
