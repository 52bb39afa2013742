-- The ten artists played most.
SELECT a.name AS artist, COUNT(*) AS plays
FROM songplays p
JOIN artists a ON a.artist_id = p.artist_id
GROUP BY a.artist_id, a.name
ORDER BY plays DESC, artist
LIMIT 10
