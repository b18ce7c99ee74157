"""flexmoe: train together, share nothing.

A FlexOlmo implementation: data owners each train one feed-forward expert against a frozen public
anchor model; a maintainer composes the experts into one mixture-of-experts model with no joint
training; owners can join late or opt out without retraining anyone else.
"""

from flexmoe.errors import FlexmoeError

__version__ = "0.1.0"

__all__ = ["FlexmoeError", "__version__"]
