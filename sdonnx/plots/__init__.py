"""A1111's scripts that make many images from one request: the X/Y/Z plot and the prompt matrix, with their
labelled grids. Built on the generation request: each cell is a request (and a model), so any runner can make
it (the local loop, the server's worker, a Ray cluster)."""
