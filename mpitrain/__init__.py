"""mpitrain: data-parallel PyTorch training over MPI with parallel-HDF5 data."""

__version__ = "0.1.0"
