"""The workshop steps as scripts (python rayjobs/NAME.py --help); importable too, so the workshop
notebook runs the same main() functions."""
