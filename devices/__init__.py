"""Device profiles and the simulator that drives them over the real protocols."""
