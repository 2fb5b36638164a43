"""Host-side Q-Zoom inference: the engine, the RoI splice and its positions, the heat map."""
