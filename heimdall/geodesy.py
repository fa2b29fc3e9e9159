"""Positions on the Earth: haversine distance and a local east/north frame in metres.

The local frame is the spherical azimuthal-equidistant projection around a reference point, so
distances from the reference are exact great-circle distances and, at the 100 km scale of a
WebSDR network, Euclidean distance in the frame agrees with haversine to well under 0.1 %.
Everything is float64: float32 cannot resolve a metre at 45 degrees of latitude.
"""
from __future__ import annotations

import numpy as np

EARTH_RADIUS_M = 6_371_008.8  # IUGG mean radius


def haversine_m(lat1, lon1, lat2, lon2):
    """Great-circle distance in metres between points given in degrees (broadcasts)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dphi = p2 - p1
    dlmb = np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dphi / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlmb / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def to_local(lat, lon, ref_lat: float, ref_lon: float):
    """(lat, lon) in degrees -> (east, north) in metres around (ref_lat, ref_lon)."""
    p0, l0 = np.radians(ref_lat), np.radians(ref_lon)
    p, l = np.radians(lat), np.radians(lon)
    dist = haversine_m(ref_lat, ref_lon, lat, lon)
    y = np.sin(l - l0) * np.cos(p)
    x = np.cos(p0) * np.sin(p) - np.sin(p0) * np.cos(p) * np.cos(l - l0)
    bearing = np.arctan2(y, x)
    return dist * np.sin(bearing), dist * np.cos(bearing)


def from_local(east, north, ref_lat: float, ref_lon: float):
    """(east, north) in metres around the reference -> (lat, lon) in degrees."""
    p0, l0 = np.radians(ref_lat), np.radians(ref_lon)
    delta = np.hypot(east, north) / EARTH_RADIUS_M
    bearing = np.arctan2(east, north)
    p = np.arcsin(np.sin(p0) * np.cos(delta) + np.cos(p0) * np.sin(delta) * np.cos(bearing))
    l = l0 + np.arctan2(np.sin(bearing) * np.sin(delta) * np.cos(p0), np.cos(delta) - np.sin(p0) * np.sin(p))
    return np.degrees(p), (np.degrees(l) + 540.0) % 360.0 - 180.0


def ellipse_outline(east: float, north: float, semi_major_m: float, semi_minor_m: float, bearing_deg: float,
                    ref_lat: float, ref_lon: float, sigmas: float = 1.0, points: int = 48):
    """An uncertainty ellipse (centre and axes in the local frame, major axis at a bearing clockwise
    from north) as a closed ring of (lat, lon) in degrees."""
    t = np.linspace(0, 2 * np.pi, points + 1)
    b = np.radians(bearing_deg)
    a, c = sigmas * semi_major_m * np.cos(t), sigmas * semi_minor_m * np.sin(t)
    # major axis along (sin b, cos b) in (east, north); minor axis along (cos b, -sin b)
    return from_local(east + a * np.sin(b) + c * np.cos(b), north + a * np.cos(b) - c * np.sin(b), ref_lat, ref_lon)
