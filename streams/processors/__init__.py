"""Stream processors in the one shape: `step(state, event) -> (state, effects)`."""
