"""Telemedicine consults: signalling and WebRTC media (aiortc)."""
