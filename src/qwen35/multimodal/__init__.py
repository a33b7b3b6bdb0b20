"""Images and video in: sizing (no torch), media loading, preprocessing, M-RoPE positions.

`sizing` is the one formula for grids and token counts (the planner imports it without torch);
`media` turns user inputs (PIL images, numpy arrays, paths, data: / http(s) URLs) into RGB
images; `processing` is transformers' Qwen 3.5 image / video preprocessing in numpy + Pillow;
`positions` computes the 3-D rotary positions of a prompt with vision tokens.
"""
