"""azaion-loader: boot-time unlock agent for edge devices."""

__version__ = "0.2.0"
