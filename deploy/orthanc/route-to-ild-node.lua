-- Orthanc -> ILD brain-metastasis node: route every stable study's MR image series to the node, once.
--
-- Loaded by Orthanc through "LuaScripts" in orthanc.json (see README.md next to this file). Orthanc calls
-- OnStableStudy when a study has received no instance for "StableAge" seconds. This script then sends the
-- study's MR image series (MR, Enhanced MR and Legacy Converted Enhanced MR storage; never SEG, SR or any
-- other object) to the DICOM modality named NODE below, over one synchronous C-STORE association.
--
-- No routing loop: the node answers with a SEG and an SR, which make the study "stable" a second time.
--   1. Only MR image series are ever sent, so the node's own SEG and SR never go back to it.
--   2. Each MR series remembers how many of its instances were sent (series metadata "IldNodeRouted",
--      declared in "UserMetadata" of orthanc.json). A series whose count did not change is not sent again,
--      so the second "stable" event (SEG + SR arrived) sends nothing. MR instances arriving later (a
--      series completed after the first routing) make the count differ: that series is sent again, and the
--      node (which ignores repeats and makes a new case version only when its inputs changed) reprocesses.
--   3. A failed C-STORE records nothing: the next stable event of the study (or the manual call in
--      README.md) tries again.

-- Symbolic name of the node in "DicomModalities" (overridable with "IldNode": {"Modality": ...} in the
-- configuration), and the metadata that records what was sent.
local NODE = 'ild-node'
local ROUTED_METADATA = 'IldNodeRouted'

-- Storage SOP classes the node may give to its model (docs/node.md, "Receive").
local MR_IMAGE_CLASSES = {
  ['1.2.840.10008.5.1.4.1.1.4'] = true,    -- MR Image Storage
  ['1.2.840.10008.5.1.4.1.1.4.1'] = true,  -- Enhanced MR Image Storage
  ['1.2.840.10008.5.1.4.1.1.4.4'] = true,  -- Legacy Converted Enhanced MR Image Storage
}

do
  local config = GetOrthancConfiguration()
  if config and type(config['IldNode']) == 'table' and config['IldNode']['Modality'] then
    NODE = config['IldNode']['Modality']
  end
end

local function get_json(uri)
  local body = RestApiGet(uri)
  if body == nil or body == '' then
    return nil
  end
  return ParseJson(body)
end

-- The number of instances of this series already sent to the node (0 if none).
local function routed_count(series_id)
  local metadata = get_json('/series/' .. series_id .. '/metadata?expand')
  return tonumber(metadata and metadata[ROUTED_METADATA]) or 0
end

-- Whether the series holds MR images the node can use (by the SOP class of its first instance).
local function is_mr_image_series(series)
  if series['MainDicomTags']['Modality'] ~= 'MR' or #series['Instances'] == 0 then
    return false
  end
  local sop_class = RestApiGet('/instances/' .. series['Instances'][1] .. '/metadata/SopClassUid')
  return sop_class ~= nil and MR_IMAGE_CLASSES[sop_class] == true
end

function OnStableStudy(studyId, tags, metadata)
  local all_series = get_json('/studies/' .. studyId .. '/series')
  if all_series == nil then
    return
  end

  local to_send = {}
  local counts = {}
  for _, series in ipairs(all_series) do
    if is_mr_image_series(series) then
      local n = #series['Instances']
      if n ~= routed_count(series['ID']) then
        table.insert(to_send, series['ID'])
        counts[series['ID']] = n
      end
    end
  end

  if #to_send == 0 then
    -- Nothing new: no MR image series, or the node's own SEG/SR arrived after the routing.
    print('ILD node: nothing new to route in study ' .. studyId)
    return
  end

  print('ILD node: sending ' .. #to_send .. ' MR series of study ' .. studyId .. ' to modality ' .. NODE)
  local answer = RestApiPost('/modalities/' .. NODE .. '/store',
                             DumpJson({ Resources = to_send, Synchronous = true }, true))
  local result = nil
  if answer ~= nil and answer ~= '' then
    result = ParseJson(answer)
  end
  if result == nil or (result['FailedInstancesCount'] or 0) > 0 then
    print('ILD node: C-STORE of study ' .. studyId .. ' to ' .. NODE .. ' failed; it is tried again at the'
          .. ' next stable event of the study, or send it by hand (README.md)')
    return
  end
  for _, series_id in ipairs(to_send) do
    RestApiPut('/series/' .. series_id .. '/metadata/' .. ROUTED_METADATA, tostring(counts[series_id]))
  end
  print('ILD node: sent study ' .. studyId .. ' (' .. math.floor(tonumber(result['InstancesCount']) or 0)
        .. ' instances)')
end
