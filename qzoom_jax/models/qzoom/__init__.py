"""Q-Zoom's branches on any backbone: the SD-RPN twig, the dynamic gate, the two-pass inference functions, and the
RoI map geometry (host NumPy) that labels, training and inference share."""
