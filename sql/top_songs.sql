-- The ten songs played most, with their artists.
SELECT s.title, a.name AS artist, COUNT(*) AS plays
FROM songplays p
JOIN songs s ON s.song_id = p.song_id
JOIN artists a ON a.artist_id = p.artist_id
GROUP BY s.song_id, s.title, a.name
ORDER BY plays DESC, s.title, artist
LIMIT 10
