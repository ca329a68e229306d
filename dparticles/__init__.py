"""dparticles: lazy, chunked cryo-EM particle stacks on Dask."""
