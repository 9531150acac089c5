// Numeric helpers that must round the way Python and numpy do, so that schedules and image sizes
// match the reference implementations exactly.

/** Python's round() and numpy.round(): halves go to the even neighbour. */
export function roundHalfEven(x: number): number {
  const floor = Math.floor(x);
  const diff = x - floor;
  if (diff < 0.5) return floor;
  if (diff > 0.5) return floor + 1;
  return floor % 2 === 0 ? floor : floor + 1;
}
