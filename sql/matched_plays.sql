-- The share of plays matched to a catalogue song (title, artist and duration all equal).
SELECT COUNT(*) AS plays, COUNT(song_id) AS matched, ROUND(100.0 * COUNT(song_id) / COUNT(*), 1) AS percent
FROM songplays
