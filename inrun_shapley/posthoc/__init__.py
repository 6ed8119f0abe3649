"""Post-hoc attribution that reads a trained model or a recorded run: the adjoint pass through
the recorded trajectory (``adjoint``), the Bayesian Influence Function (``bif``) and learned
parameter-group weights (``weighting``). Each is its own package; importing this one imports
none of them."""
