"""azaion-loader: boot-time unlock agent for edge devices."""

__version__ = "0.1.0"
