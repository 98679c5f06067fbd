"""Calibration passes that need data and a model forward: SCF-RKL's functional importance."""
