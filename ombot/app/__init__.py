"""The composition root: the `ombot` command and what starts OMBot's processes. It may import every
package; nothing imports it (`python -m ombot` and the `ombot` script are its only callers)."""
