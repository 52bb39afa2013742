-- Plays on the free and the paid level (the level at the time of each play), and their share.
SELECT level, COUNT(*) AS plays, ROUND(100.0 * COUNT(*) / SUM(COUNT(*)) OVER (), 1) AS percent
FROM songplays
GROUP BY level
ORDER BY level
