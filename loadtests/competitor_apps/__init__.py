"""Other model servers doing the same work; loadtests/competitors.py starts them."""
