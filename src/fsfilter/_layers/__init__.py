"""The layers of a filter stack above the pass-through: what a CBFilter does to the requests of its mount."""
